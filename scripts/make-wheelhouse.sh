#!/usr/bin/env bash
# Fill wheelhouse/ with every wheel the image needs (CPython 3.11, manylinux x86_64): the project's
# dependencies from pyproject.toml with torch/torchvision pinned, plus setuptools and wheel to build
# thresher itself, so that `docker build --build-arg PIP_NO_INDEX=1 .` needs no network at all.
# Reuses the wheelhouse when it already resolves everything offline.
#
#   scripts/make-wheelhouse.sh             (PYTHON=python3.11 to pick the host interpreter;
#                                           EXTRAS=s3,gcs for an image built with those extras)
#   EXTRAS=ray scripts/make-wheelhouse.sh  the image .ci/run builds (`--build-arg EXTRAS=ray`: Ray
#                                           and its wheels, ~150 MB more; docker-compose.ray.yml)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
wheelhouse=${WHEELHOUSE:-wheelhouse}
torch_spec=${TORCH_SPEC:-torch==2.14.1}
torchvision_spec=${TORCHVISION_SPEC:-torchvision==0.29.1}
mkdir -p "$wheelhouse"

# The wheels are downloaded for the host, so the host must look like the image: CPython 3.11.
host_tag=$("$python" -c 'import sys; print(f"{sys.implementation.name}{sys.version_info[0]}{sys.version_info[1]}")')
if [ "$host_tag" != cpython311 ]; then
    echo "make-wheelhouse: need CPython 3.11 on the host to match the image, got $host_tag ($python)" >&2
    exit 1
fi

requirements=$(mktemp /tmp/thresher-requirements.XXXXXX)
trap 'rm -f "$requirements"' EXIT
# The same requirements the Dockerfile installs (scripts/image-requirements.py), with the extras
# named in EXTRAS (e.g. EXTRAS=s3 for `--build-arg EXTRAS=s3`) and torch/torchvision pinned.
"$python" - "$torch_spec" "$torchvision_spec" "${EXTRAS:-}" > "$requirements" <<'PY'
import runpy, sys
requirements = runpy.run_path("scripts/image-requirements.py")["requirements"]
pins = {spec.split("=")[0]: spec for spec in sys.argv[1:3]}
for dep in requirements("pyproject.toml", sys.argv[3]):
    name = dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
    print(pins.pop(name, dep))
print(*pins.values(), sep="\n")
print("setuptools>=68")
print("wheel")
PY
# The image's platform: glibc 2.36 (Debian bookworm) on x86_64. pip does not expand a
# manylinux_2_X tag to the older ones it implies, so name them all.
platforms=()
for minor in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

# Would an offline install for the image's platform succeed from the wheelhouse alone?
resolves_offline() {
    "$python" -m pip install --dry-run --quiet --ignore-installed --no-index \
        --find-links "$wheelhouse" --target /tmp/thresher-wheelhouse-check \
        --only-binary=:all: "${platforms[@]}" --python-version 3.11 \
        --implementation cp --abi cp311 -r "$requirements"
}

if resolves_offline 2>/dev/null; then
    echo "wheelhouse $wheelhouse is complete ($(du -sh "$wheelhouse" | cut -f1)); nothing to do"
    exit 0
fi

"$python" -m pip download --dest "$wheelhouse" --prefer-binary -r "$requirements"

# A few dependencies ship only as source (antlr4-python3-runtime, for one): turn them into wheels
# here so the image build never compiles anything.
shopt -s nullglob
for sdist in "$wheelhouse"/*.tar.gz "$wheelhouse"/*.zip; do
    "$python" -m pip wheel --no-deps --wheel-dir "$wheelhouse" "$sdist"
    rm -f "$sdist"
done

resolves_offline
echo "wheelhouse $wheelhouse is complete ($(du -sh "$wheelhouse" | cut -f1))"
