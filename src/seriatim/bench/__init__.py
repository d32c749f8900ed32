"""`seriatim bench`: speed against llama.cpp and transformers, concurrency, the HTTP server, and quality."""
