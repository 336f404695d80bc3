#!/usr/bin/env python3
"""The image's requirements, read from pyproject.toml, and a check of the torch it got.

    image-requirements.py PYPROJECT [EXTRAS]     the dependencies, plus those of the extras named
                                                 (comma-separated), one per line
    image-requirements.py --check-torch VARIANT  exit 2 unless the installed torch is the VARIANT
                                                 build (cpu: no CUDA; cuda: CUDA)

Used by the Dockerfile (build args EXTRAS and TORCH_VARIANT), so a wrong name fails the build with
one line instead of an image without what was asked for.
"""
import sys


def requirements(pyproject: str, extras: str) -> list:
    import tomllib

    project = tomllib.load(open(pyproject, "rb"))["project"]
    optional = project.get("optional-dependencies", {})
    names = [name.strip() for name in extras.split(",") if name.strip()]
    unknown = [name for name in names if name not in optional]
    if unknown:
        sys.exit(f"EXTRAS={extras}: no extra {', '.join(unknown)} in pyproject.toml; "
                 f"choose from {', '.join(sorted(optional))}")
    lines = list(project["dependencies"])
    for name in names:
        lines += [dep for dep in optional[name] if dep not in lines]
    return lines


def check_torch(variant: str) -> None:
    """The torch build asked for, and a torchvision whose compiled ops load with it: PyPI's
    torchvision beside a CPU-only torch imports only as far as a missing libcudart."""
    import torch

    cuda = torch.version.cuda
    print(f"torch {torch.__version__}, CUDA {cuda or 'none'}")
    if variant not in ("cpu", "cuda"):
        sys.exit(f"TORCH_VARIANT={variant} is not a variant: use cuda or cpu")
    if (cuda is None) != (variant == "cpu"):
        sys.exit(f"TORCH_VARIANT={variant}, but torch {torch.__version__} (CUDA {cuda or 'none'}) was "
                 f"installed: put the {variant} wheels of torch and torchvision in wheelhouse/")
    try:
        import torchvision
        from torchvision.ops import nms

        nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0]), 0.5)
    except Exception as error:  # RuntimeError: operator torchvision::nms does not exist, ...
        sys.exit(f"torchvision does not work with torch {torch.__version__} ({type(error).__name__}: "
                 f"{str(error).splitlines()[0]}): install the torchvision build made for this torch "
                 f"(for cpu, from the same index)")
    print(f"torchvision {torchvision.__version__}: its ops load")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check-torch"]:
        check_torch(sys.argv[2])
    else:
        print(*requirements(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""), sep="\n")
