"""OpenAI's files and fine-tuning jobs API, its protocol, and the runners that start jobs (local, Kubernetes)."""
