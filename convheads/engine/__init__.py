"""The training engine: fine-tuning (training.py), evaluation (evaluation.py), data parallelism over
processes (distributed.py) and timers (timing.py). It stands above the method modules: training
gives the parameters that replacement and DSP create their own optimiser groups."""
