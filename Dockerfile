# GPU image: vLLM's CUDA build at the same version as the CPU build the tests run
# (tests/test_deploy_files.py checks VLLM_VERSION against requirements.txt).
# VLLM_IMAGE_SUFFIX selects the CUDA build (builder/cuda_variants.py): "" is CUDA 13.0 (hosts
# with CUDA 13.0 drivers), "-cu129" is CUDA 12.9 (hosts with CUDA 12.9 or newer drivers).
ARG VLLM_VERSION=0.32.0
ARG VLLM_IMAGE_SUFFIX=""
FROM vllm/vllm-openai:v${VLLM_VERSION}${VLLM_IMAGE_SUFFIX}

# Model baking (optional): docker build --build-arg MODEL_NAME=org/model \
#   [--secret id=HF_TOKEN,env=HF_TOKEN] .   The token is a build secret, never an ARG or ENV.
ARG MODEL_NAME=""
ARG MODEL_REVISION=""
# hadolint's DL3064 (sensitive data in ARG/ENV) reads "TOKEN" in these names; they hold a model
# id, a revision and a switch for the tokenizers library, no secret.
# hadolint ignore=DL3064
ARG TOKENIZER_NAME=""
# hadolint ignore=DL3064
ARG TOKENIZER_REVISION=""
ARG QUANTIZATION=""
ARG BASE_PATH="/runpod-volume"

# hadolint ignore=DL3064
ENV BASE_PATH=${BASE_PATH} \
    HF_HOME=${BASE_PATH}/huggingface-cache \
    TOKENIZERS_PARALLELISM=false \
    RUNPOD_LOG_LEVEL=INFO \
    PYTHONUNBUFFERED=1

WORKDIR /worker
COPY builder/requirements.txt builder/requirements.txt
RUN python3 -m pip install --no-cache-dir -r builder/requirements.txt

COPY src src
COPY builder builder

# Baked models live under /opt/worker-vllm, where a network volume cannot shadow them.
RUN --mount=type=secret,id=HF_TOKEN,required=false \
    if [ -n "$MODEL_NAME" ]; then \
      MODEL_NAME="$MODEL_NAME" MODEL_REVISION="$MODEL_REVISION" \
      TOKENIZER_NAME="$TOKENIZER_NAME" TOKENIZER_REVISION="$TOKENIZER_REVISION" \
      QUANTIZATION="$QUANTIZATION" python3 builder/bake_model.py; \
    fi

# The base image's entrypoint is `vllm serve`; this image runs the RunPod worker instead.
ENTRYPOINT []
CMD ["python3", "src/handler.py"]
