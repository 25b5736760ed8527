"""Tokenizers: GPT-2's, ones trained on your corpus, and those of model directories.

Every tokenizer here speaks tiktoken's ``Encoding`` interface (``encode``,
``encode_ordinary``, ``decode``, ``n_vocab``, ``eot_token``), so the data loaders,
generation and fine-tuning take any of them.

- ``gpt2``: GPT-2's 50,257-token BPE, built offline for tiktoken (the default).
- ``hf``: byte-level BPE trained on your text with Hugging Face ``tokenizers``
  (``train_bpe``), saved and loaded as ``tokenizer.json`` (ours or Qwen3's).
- ``llama3``: Llama 3's ``tokenizer.model`` (tiktoken's file format) through tiktoken.
- ``load``: ``load_tokenizer("gpt2" | directory | file)``, ``model_tokenizer`` (a model
  directory's own) and ``check_vocab_size``.
- ``chat``: chat templates (Llama 3's header tokens, Qwen3's ``<|im_start|>``).
- ``bits``: bits per character, the loss that compares vocabularies.
- ``command``: ``numpygpt tokenizer train``.
"""

from .gpt2 import (EOT, EOT_ID, GPT2_PAT_STR, N_VOCAB, TokenizerFilesError, decode, encode, get_tokenizer,
                   gpt2_bpe_files, text_to_token_ids, token_ids_to_text)
from .hf import HFTokenizer, TokenizerError, load_tokenizer_json, merges_of, train_bpe
from .llama3 import LLAMA3_PAT_STR, TiktokenModel, llama3_special_tokens, load_tiktoken_model
from .load import (check_same_tokenizer, check_vocab_size, find_tokenizer_file, is_gpt2, load_saved_tokenizer,
                   load_tokenizer, model_tokenizer, save_tokenizer, tokenizer_record)
from .bits import bits_per_character, text_bits_per_character
from .chat import ChatTemplate, chat_template, encode_chat, llama3_chat, qwen3_chat

__all__ = [
    "EOT", "EOT_ID", "GPT2_PAT_STR", "N_VOCAB", "TokenizerFilesError", "decode", "encode", "get_tokenizer",
    "gpt2_bpe_files", "text_to_token_ids", "token_ids_to_text",
    "HFTokenizer", "TokenizerError", "load_tokenizer_json", "merges_of", "train_bpe",
    "LLAMA3_PAT_STR", "TiktokenModel", "llama3_special_tokens", "load_tiktoken_model",
    "check_same_tokenizer", "check_vocab_size", "find_tokenizer_file", "is_gpt2", "load_saved_tokenizer",
    "load_tokenizer", "model_tokenizer", "save_tokenizer", "tokenizer_record",
    "bits_per_character", "text_bits_per_character", "ChatTemplate", "chat_template", "encode_chat", "llama3_chat", "qwen3_chat",
]
