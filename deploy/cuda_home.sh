#!/bin/sh
# Print the CUDA toolkit root and the folder holding libcudart, one per line,
# or exit 1 when there is no usable toolkit.  nvcc is taken from $NVCC, then
# PATH, then /usr/local/cuda/bin.  The root is what nvcc itself reports (TOP
# in --dryrun), so a wrapper script on PATH (/usr/local/bin/nvcc that execs
# /usr/local/cuda-X/bin/nvcc) still finds the real toolkit.  libcudart is
# looked for in lib64, lib and targets/*/lib: toolkits differ.
nvcc=${NVCC:-}
[ -n "$nvcc" ] || nvcc=$(command -v nvcc 2>/dev/null || true)
[ -n "$nvcc" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc; }
[ -n "$nvcc" ] || exit 1
top=$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
if [ -n "$top" ] && [ -d "$top" ]; then
  top=$(cd "$top" && pwd -P)
else
  top=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
fi
[ -x "$top/bin/nvcc" ] || exit 1
for d in "$top/lib64" "$top/lib" "$top"/targets/*/lib; do
  if [ -e "$d/libcudart.so" ]; then
    echo "$top"
    echo "$d"
    exit 0
  fi
done
exit 1
