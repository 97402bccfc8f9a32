"""The embedded tiny model: a Llama-style config and a byte-level BPE tokenizer trained on text shipped in
``fastalign/data/``, saved with ``save_pretrained`` so everything loads it like a real checkpoint. Offline and
deterministic: the trainers use it when no ``--model`` is given, the tests and the demo build their own.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from fastalign.train.data import DATA_DIR

TINY_CORPUS = DATA_DIR / "tiny_corpus.txt"
TINY_VOCAB_SIZE = 384
TINY_RMS_NORM_EPS = 1e-6
# The same tiny model with head_dim 64 (hidden 128, 2 heads): vLLM's CPU attention refuses the default's 16.
# build_tiny_model_and_tokenizer(out, **VLLM_TINY_SHAPE) builds it for the vLLM tests and benchmark.
VLLM_TINY_SHAPE = dict(hidden_size=128, num_heads=2, num_kv_heads=2, intermediate_size=256)

# The tiny tokenizer's specials and chat format. The template is prefix-stable: rendering messages[:-1] with
# add_generation_prompt=True is a prefix of rendering all messages, which the data code relies on for masks.
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tokenizer(corpus: str | os.PathLike = TINY_CORPUS, vocab_size: int = TINY_VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on ``corpus`` (digits kept one per token), with pad/bos/eos, role
    tokens and a chat template. Offline and deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    text = Path(corpus).read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=list(ROLE_TOKENS))
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_tiny_model_and_tokenizer(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 512,
    vocab_size: int = TINY_VOCAB_SIZE,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Build a tiny Llama-style model (random init, ``seed``) and the tiny tokenizer; save both to ``out_dir``
    (safetensors). Returns the directory, loadable by ``models.load_model`` / ``models.load_tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, rms_norm_eps=TINY_RMS_NORM_EPS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def default_tiny_model_dir() -> Path:
    """The embedded model, built once per user into a cache directory (``FASTALIGN_CACHE`` overrides)."""
    root = Path(os.environ.get("FASTALIGN_CACHE", Path.home() / ".cache" / "fastalign"))
    path = root / "tiny-llama"
    if not (path / "config.json").is_file():
        tmp = root / f".tiny-llama-tmp-{os.getpid()}"
        build_tiny_model_and_tokenizer(tmp)
        try:
            os.rename(tmp, path)  # atomic: concurrent builders race harmlessly
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
