#!/usr/bin/env bash
# Builds .gpu_site/: the Python packages a GPU machine with torch but no network lacks for
# bench/gpu_check.sh, as wheels (and DeepSpeed's package folder as a tarball), about 15 MB: the
# check unpacks them into a folder on PYTHONPATH (unpacked they are ~85 MB, more than the 64 MiB
# a device call may carry). Run it on a development machine with this project's venv active and
# PyPI reachable; then carry the folder.
#
#   bash bench/gpu_site.sh [PYTHON_VERSION]     # default 3.12, the GPU machine's Python
#
# - DeepSpeed is pure Python when its ops are not prebuilt: its package folder and dist-info are
#   copied from this venv (the check's default optimizer, torch's fused AdamW, builds nothing).
# - webdataset, braceexpand, diffusers (the peer), pydantic with the pydantic-core its metadata
#   names, annotated-types, typing-inspection, typing-extensions and hjson (DeepSpeed's imports)
#   come as wheels for that Python and are unpacked without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
DEST=.gpu_site
WHEELS=$DEST/wheels
rm -rf "$DEST" && mkdir -p "$WHEELS"

python - "$DEST" <<'EOF'
import importlib.metadata as md, pathlib, shutil, sys
import deepspeed
dest = pathlib.Path(sys.argv[1])
import tarfile
package = pathlib.Path(deepspeed.__file__).parent
info = pathlib.Path(md.distribution("deepspeed")._path)
with tarfile.open(dest / "deepspeed.tar.gz", "w:gz") as tar:
    for folder in (package, info):
        tar.add(folder, arcname=folder.name, filter=lambda t: None if "__pycache__" in t.name else t)
print(f"deepspeed {deepspeed.__version__} packed")
EOF

# The pydantic-core that pydantic pins (a mismatch fails at import).
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$WHEELS" pydantic
core=$(unzip -p "$WHEELS"/pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p' | head -1)
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$WHEELS" \
  "pydantic-core==$core" annotated-types typing-inspection typing-extensions webdataset braceexpand diffusers hjson
du -sh "$DEST"
echo "carry $DEST with the working tree (device tool: carry [\".gpu_site\"]); bench/gpu_check.sh puts it on PYTHONPATH"
