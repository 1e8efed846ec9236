"""What the forkserver of tests/mp.py imports once per test session beyond its package list, so
that no rank imports it again: the job and the demo model's sampler (about 1 s per rank), the
diffusers transformer and pipeline classes the diffusers tests build (about 3.5 s per rank; the
`diffusers` package imports them lazily, on first use)."""
import moe_ep.job  # noqa: F401
import moe_ep.models.diffusers.pipeline  # noqa: F401
import moe_ep.models.diffusers.served  # noqa: F401
import moe_ep.models.moedit.sampler  # noqa: F401
import moe_ep.models.moedit.served  # noqa: F401
from diffusers import (AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,  # noqa: F401
                       HiDreamImagePipeline, HiDreamImageTransformer2DModel, NucleusMoEImagePipeline,
                       NucleusMoEImageTransformer2DModel)
