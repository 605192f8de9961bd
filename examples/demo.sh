#!/usr/bin/env bash
# The README's first command (`make demo`): the main job on a simulated 2 x T4 host, no GPU needed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd -P)"
scratch=""
if [ -z "${DEMO_DIR:-}" ]; then scratch="$(cd "$(mktemp -d)" && pwd -P)"; fi
host="${DEMO_DIR:-$scratch/host}"

# Remove a simulated host left by an earlier demo, and nothing else: the path must be inside this
# repository (or a fresh mktemp directory) and, if it exists, be a simulated host.
clean() {
  local dir parent
  parent="$(cd "$(dirname "$1")" 2>/dev/null && pwd -P)" || { echo "demo: $1: parent directory missing" >&2; exit 2; }
  dir="$parent/$(basename "$1")"
  case "$(basename "$1")" in .|..|/) echo "demo: refusing to delete $1" >&2; exit 2 ;; esac
  case "$dir" in
    "$repo"/?*) ;;
    *) if [ -z "$scratch" ] || [[ "$dir" != "$scratch"/?* ]]; then
         echo "demo: refusing to delete $dir: not inside $repo" >&2; exit 2
       fi ;;
  esac
  if [ -e "$dir" ] && [ ! -d "$dir/.vgpu-dm-sim" ]; then
    echo "demo: refusing to delete $dir: it is not a simulated host" >&2; exit 2
  fi
  rm -rf -- "$dir"
}
clean "$host"
export VGPU_DM_SIM="$host"

step() { printf '\n$ %s\n' "$*"; }
part() { printf '\n# %s\n' "$*"; }

part "Part 1: two Tesla T4s (mdev): apply a layout, list it, check it with assert."
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
clean "$h100"
part "Part 2: two H100s (vendor-specific VFIO, vGPU 17+): apply enables their SR-IOV VFs, switches"
printf '# mixed-size mode on and puts one vGPU on each VF: 1 x 40C + 2 x 10C + 5 x 4C per GPU.\n'
step nvidia-vgpu-dm sim create "$h100" --gpu H100 --gpu H100
nvidia-vgpu-dm sim create "$h100" --gpu H100 --gpu H100

step nvidia-vgpu-dm apply --sim "$h100" -f examples/config-h100.yaml -c H100-mixed
nvidia-vgpu-dm apply --sim "$h100" -f "$here/config-h100.yaml" -c H100-mixed

step nvidia-vgpu-dm list --sim "$h100"
nvidia-vgpu-dm list --sim "$h100"

step nvidia-vgpu-dm assert --sim "$h100" -f examples/config-h100.yaml -c H100-mixed
nvidia-vgpu-dm assert --sim "$h100" -f "$here/config-h100.yaml" -c H100-mixed
echo "exit code $? (H100-mixed is applied)"
