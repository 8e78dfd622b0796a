"""Checkpoint conversion: training checkpoints <-> inference folders, and the authors' weights.

* ``inference``: the inference folder (``model.safetensors`` [sharded + index] + ``config.json``
  [+ ``tokenizer/spm.model``]) that ``launch.py sample`` loads without torch.distributed state;
* ``training``: read a training checkpoint's full weights, write a fine-tuning checkpoint;
* ``ml_starflow``: map apple/ml-starflow's flat state dict and YAML onto our names and config;
* ``ml_starflow_export``: the inverse, our checkpoint as their ``.pth`` + ``arguments:`` YAML;
* ``checks``: state-dict and config-vs-weights checks that list every problem at once.
"""
