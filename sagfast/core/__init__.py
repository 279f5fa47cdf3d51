"""What every layer above the ops shares: settings and their checks, the noise schedule, the
batch layout of a model call."""
