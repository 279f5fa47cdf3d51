"""SAG's ops. Each module holds `<op>_ref` (plain PyTorch: the spec), its backends and `<op>()`."""

from sagfast.ops._dispatch import BackendUnsupported, clear_cache
from sagfast.ops.attention_mass import attention_mass, attention_mass_ref
from sagfast.ops.combine import combine, combine_ref
from sagfast.ops.degrade import blur_ref, blur_time, degrade, degrade_ref, gaussian_weights
from sagfast.ops.mask import sag_mask_ref, upsample_mask_ref

__all__ = [
    "BackendUnsupported",
    "clear_cache",
    "attention_mass",
    "attention_mass_ref",
    "blur_ref",
    "blur_time",
    "combine",
    "combine_ref",
    "degrade",
    "degrade_ref",
    "gaussian_weights",
    "sag_mask_ref",
    "upsample_mask_ref",
]
