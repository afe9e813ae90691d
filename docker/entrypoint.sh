#!/usr/bin/env bash
# Entrypoint of the textscythe-vllm image: `vllm serve` with the plugin's launch flags.
#
#   MODEL                      model to serve (Hugging Face id or path); required (the image sets a default)
#   PORT                       port of the OpenAI-compatible API and /metrics (default 8000)
#   TEXTSCYTHE_DEFAULT_BUDGET  optional server-default visual_token_budget (an integer 1..1048576, visual
#                              tokens kept per image) for requests that send none
#
# Any arguments (the container's command) are appended to `vllm serve`, e.g. `--max-model-len 4096`.
# Do not pass --middleware / --trust-request-mm-kwargs again: they are added here.
set -euo pipefail

die() {
  echo "textscythe-vllm entrypoint: $*" >&2
  exit 2
}

[[ -n "${MODEL:-}" ]] || die "MODEL is not set: set it to the model to serve, e.g. MODEL=llava-hf/llava-1.5-7b-hf"

PORT="${PORT:-8000}"
if [[ ! "$PORT" =~ ^[1-9][0-9]{0,4}$ ]] || (( PORT > 65535 )); then
  die "PORT must be a TCP port number (1..65535), got '${PORT}'"
fi

args=(
  serve "$MODEL"
  --middleware textscythe_vllm.middleware.VisualTokenBudgetMiddleware
  --trust-request-mm-kwargs
  --host 0.0.0.0
  --port "$PORT"
)

if [[ -n "${TEXTSCYTHE_DEFAULT_BUDGET:-}" ]]; then
  budget="$TEXTSCYTHE_DEFAULT_BUDGET"
  # A positive decimal integer without sign or leading zeros (so it is also valid JSON), at most 1048576.
  if [[ ! "$budget" =~ ^[1-9][0-9]{0,6}$ ]] || (( budget > 1048576 )); then
    die "TEXTSCYTHE_DEFAULT_BUDGET must be a positive integer (1..1048576, visual tokens kept per image), got '${budget}'; unset it to serve without a default budget"
  fi
  for arg in "$@"; do
    if [[ "$arg" == --mm-processor-kwargs* ]]; then
      die "TEXTSCYTHE_DEFAULT_BUDGET and a --mm-processor-kwargs argument were both given; put the budget into your --mm-processor-kwargs JSON instead (\"visual_token_budget\": N)"
    fi
  done
  args+=(--mm-processor-kwargs "{\"visual_token_budget\": ${budget}}")
fi

exec vllm "${args[@]}" "$@"
