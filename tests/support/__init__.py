"""What the test modules share that is not a test: tiny models and tokenizers built from configs
(`tiny`), PEFT adapters with a known ΔW (`adapters`), the CLI run in-process (`cli`). conftest.py
puts tests/ on the path, so test modules import `support.*`; they never import each other."""
