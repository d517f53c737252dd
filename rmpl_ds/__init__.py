"""rmpl_ds: distributed fine-tuning of 7-8B vision-language models on DeepSpeed.

Reproduces RMPL (Relation-aware Multi-task Progressive Learning) for multimedia event extraction:
real dataset formats -> unified records -> indexed WebDataset shards -> an exact-ratio slot-stream
sampler -> a DeepSpeed ZeRO-2 engine (LoRA / QLoRA) -> Stage I -> Stage II hand-off -> M2E2 scoring.
"""

__version__ = "0.1.0"
