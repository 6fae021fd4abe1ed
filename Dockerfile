# Hugging Face Docker Space for ncp-arena (sdk: docker, app_port: 7860).
# On GPU hardware, PyPI's torch==2.13.0 wheel is the CUDA build; on CPU hardware it runs on the CPU.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*

# Spaces run the container as uid 1000.
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH \
    HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 PYTHONUNBUFFERED=1
WORKDIR /home/user/app

# Same requirements file CI installs.
COPY --chown=user requirements.txt .
RUN pip install --no-cache-dir --user -r requirements.txt

COPY --chown=user . .

# Persistent storage, when enabled on the Space, is mounted at /data; app.py uses it automatically (NCP_DATA_DIR
# overrides). SDXL: set NCP_MODEL to a hub id or a folder (secrets arrive as environment variables).
EXPOSE 7860
CMD ["python", "app.py"]
