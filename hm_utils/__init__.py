"""Hi-Merging: training-free hierarchical iterative merging of fine-tuned LLMs.

Modules follow the pipeline stages: ``data``, ``prompts``, ``finetune``, ``evaluate``,
``merge``, ``contribution``, ``himerging``, ``figures`` and ``runs``; ``models`` provisions
checkpoints.
"""

__version__ = "0.1.0"
