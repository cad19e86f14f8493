"""The application side of ssod_zoo: training, evaluation, the demo, the synthetic benchmark, plots and the CLI.

It imports the library (``ssod_zoo``) and needs the ``[train]`` extra (tqdm, matplotlib, pillow); the library
never imports it, so ``import ssod_zoo`` and ``timm.create_model('ssod_...')`` load no training dependency.
"""
