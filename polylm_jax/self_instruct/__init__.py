"""Self-instruct: growing a multilingual instruction set from seed tasks with a chat model, as
MultiAlpaca was made (rouge.py, filters.py, client.py, generate.py; `polylm-self-instruct`)."""
