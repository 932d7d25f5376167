"""The OpenAI API's meaning, apart from HTTP: request/response models, replies, and the Backend protocol."""
