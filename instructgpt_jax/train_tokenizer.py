"""Train a byte-level BPE on a local or gs:// corpus and save its tokenizer.json:

    python -m instructgpt_jax.train_tokenizer --corpus='/data/text/*.txt' --vocab_size=8192 --out=/data/tok.json

The corpus is comma-separated globs of .txt files and .jsonl files of {"text": ...} records (data/text.py).
"""

from __future__ import annotations

import argparse

from instructgpt_jax.data import text
from instructgpt_jax.data import tokenizer as tokenizer_lib


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Train a byte-level BPE on a local corpus; save a tokenizer.json.")
  parser.add_argument("--corpus", required=True, help="comma-separated globs of .txt / .jsonl ({'text'}) files")
  parser.add_argument("--vocab_size", type=int, required=True)
  parser.add_argument("--min_frequency", type=int, default=2)
  parser.add_argument("--out", required=True, help="path of the tokenizer.json to write")
  args = parser.parse_args(argv)
  documents = text.load_documents(args.corpus)
  tokenizer = tokenizer_lib.train_bpe(documents, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
  tokenizer.save(args.out)
  print(f"tokenizer: {tokenizer.vocab_size} ids written to {args.out}")


if __name__ == "__main__":
  main()
