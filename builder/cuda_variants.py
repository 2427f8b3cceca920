"""The CUDA builds of vLLM's release image, in one place.

Since vLLM 0.20 the unsuffixed `vllm/vllm-openai:v<version>` images are built on CUDA 13.0 and
the CUDA 12.9 builds carry a `-cu129` suffix. A host's driver must support the image's CUDA,
and a driver runs every CUDA up to its own, so an image may run on hosts of its CUDA or newer.
The Dockerfile's VLLM_IMAGE_SUFFIX build argument selects the variant; the deploy files list
the default variant's CUDA versions (a test checks the Dockerfile against this table).
"""

from __future__ import annotations

# variant -> (image tag suffix, CUDA version of the image)
VARIANTS: dict[str, tuple[str, str]] = {
    "cu130": ("", "13.0"),
    "cu129": ("-cu129", "12.9"),
}
DEFAULT_VARIANT = "cu130"
# Every CUDA version the platform's API accepts in allowedCudaVersions (its CudaVersion enum),
# oldest first. RunPod matches the list exactly against a host's reported CUDA, so a listing
# names every version at or above its image's; add new ones here as RunPod adds them.
PLATFORM_CUDA = ["11.8", "12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.7", "12.8",
                 "12.9", "13.0"]


def cuda_of(variant: str) -> str:
    return VARIANTS[variant][1]


def allowed_cuda(variant: str) -> list[str]:
    """Host CUDA versions that can run the variant's image: its own and newer."""
    own = tuple(int(p) for p in cuda_of(variant).split("."))
    return [v for v in PLATFORM_CUDA if tuple(int(p) for p in v.split(".")) >= own]


def variant_of_suffix(suffix: str) -> str:
    (variant,) = [name for name, (s, _) in VARIANTS.items() if s == suffix]
    return variant
