#!/usr/bin/env bash
# The README's first command (`make demo`): the main job on a simulated 2 x T4 host, no GPU needed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
host="${DEMO_DIR:-$(mktemp -d)/host}"
rm -rf "$host"
export VGPU_DM_SIM="$host"

step() { printf '\n$ %s\n' "$*"; }

step nvidia-vgpu-dm sim create "$host" --gpu T4 --gpu T4
nvidia-vgpu-dm sim create "$host" --gpu T4 --gpu T4

step nvidia-vgpu-dm apply -f examples/config-t4.yaml -c T4-small
nvidia-vgpu-dm apply -f "$here/config-t4.yaml" -c T4-small

step nvidia-vgpu-dm list
nvidia-vgpu-dm list

step nvidia-vgpu-dm assert -f examples/config-t4.yaml -c T4-large
if nvidia-vgpu-dm assert -f "$here/config-t4.yaml" -c T4-large; then
  echo "unexpected: T4-large should not be applied" >&2; exit 1
else
  echo "exit code $? (T4-large is not what the host has)"
fi

step nvidia-vgpu-dm assert -f examples/config-t4.yaml -c T4-small
nvidia-vgpu-dm assert -f "$here/config-t4.yaml" -c T4-small
echo "exit code $? (T4-small is applied)"

# The same on a vendor-specific VFIO host (vGPU 17+): two H100s whose VFs start disabled.
h100="$host-h100"
rm -rf "$h100"
step nvidia-vgpu-dm sim create "$h100" --gpu H100 --gpu H100
nvidia-vgpu-dm sim create "$h100" --gpu H100 --gpu H100

step nvidia-vgpu-dm apply --sim "$h100" -f examples/config-h100.yaml -c H100-mixed
nvidia-vgpu-dm apply --sim "$h100" -f "$here/config-h100.yaml" -c H100-mixed

step nvidia-vgpu-dm list --sim "$h100"
nvidia-vgpu-dm list --sim "$h100"

step nvidia-vgpu-dm assert --sim "$h100" -f examples/config-h100.yaml -c H100-mixed
nvidia-vgpu-dm assert --sim "$h100" -f "$here/config-h100.yaml" -c H100-mixed
echo "exit code $? (H100-mixed is applied)"
