"""Continued training of a (sheared) model with dynamic batch loading, on the reference corpus's four domains.

The reference losses are the source model's own per-domain validation losses (Sheared LLaMA's choice when the
source model is at hand). By default the source and the trained model are both SmolLM2-135M, so this shows the
mechanics; pass ``--model`` a pruned checkpoint (e.g. one written by ``optimum_admm.structured.prune_to_shape``)
to continue training it toward its source.

    python examples/dynamic_batch_loading.py --model path/to/sheared --max-steps 400 --eval-steps 50

Checkpoints in ``--output-dir`` carry the data state; ``--resume`` continues exactly where a run stopped.
``--text-dir`` replaces the corpus with a folder of ``<domain>.txt`` files (each used for training and validation).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from optimum_admm.corpus import DOMAINS, load_corpus
from optimum_admm.structured.dynamic_batch_loading import (
    DynamicBatchLoadingCallback,
    DynamicBatchLoadingConfig,
    MultiDomainDataset,
    PackedSequences,
    collate_packed,
    domain_losses,
)
from optimum_admm.zoo import materialize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="source model (default: SmolLM2-135M from the zoo)")
    parser.add_argument("--model", default=None, help="model to train (default: the source)")
    parser.add_argument("--output-dir", default="dbl-output")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--rule", default="paper", choices=["paper", "reference_code", "constant"])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--text-dir", default=None, help="a folder of <domain>.txt files instead of the corpus")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    source_path = args.source or str(materialize("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(source_path)
    length = args.sequence_length
    if args.text_dir:
        from datasets import Dataset

        files = {
            path.stem: Dataset.from_dict({"text": [path.read_text()]}) for path in Path(args.text_dir).glob("*.txt")
        }
        domains, train_data, validation_data = sorted(files), files, files
    else:
        domains = DOMAINS
        train_data = {d: load_corpus("train", [d]) for d in domains}
        validation_data = {d: load_corpus("validation", [d]) for d in domains}
    validation = {d: PackedSequences(validation_data[d], length, tokenizer, max_tokens=8 * length) for d in domains}
    # Reference losses: the source model's own losses on the same validation sequences.
    reference = domain_losses(AutoModelForCausalLM.from_pretrained(source_path), validation)

    train = MultiDomainDataset(train_data, length, tokenizer=tokenizer, weights=[1.0] * len(domains))
    callback = DynamicBatchLoadingCallback(
        train, DynamicBatchLoadingConfig(rule=args.rule, reference_losses=reference)
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_steps=args.eval_steps,
        ignore_data_skip=True,  # the callback restores the exact data position itself
        dataloader_num_workers=args.num_workers,  # the weights reach the workers through shared memory
        report_to=[],
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(args.model or source_path),
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collate_packed,
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    for entry in callback.trajectory:
        logging.info("step %d: %s", entry["step"], {d: round(w, 4) for d, w in entry["weights"].items()})


if __name__ == "__main__":
    main()
