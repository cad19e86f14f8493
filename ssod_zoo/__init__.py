"""ssod_zoo: timm classifiers that know when an image is not one of their classes (SSOD).

Importing the package registers the ``ssod_*`` models with timm. After ``pip install``, a fresh
interpreter does not even need the import: ``timm.create_model('ssod_resnet18')`` works on its own
(set ``SSOD_ZOO_AUTOLOAD=0`` to switch that off).
"""
from .adapter import SSODModel, UntrainedOODHeadWarning, wrap
from .output import (SpatialOutput, SSODOutput, SSODScores, posterior_score, robust_posterior, spatial_maxlogit_score,
                     spatial_posterior_score)
from .hub import calibrate_threshold, load_checkpoint, load_model, push_folder, push_to_hub, save_pretrained
from .registry import register  # importing it registers the ssod_* models with timm

__version__ = '0.1.0'

__all__ = ['SSODModel', 'SSODOutput', 'SSODScores', 'SpatialOutput', 'calibrate_threshold', 'load_checkpoint',
           'load_model', 'push_folder', 'push_to_hub', 'posterior_score', 'register', 'robust_posterior',
           'spatial_maxlogit_score', 'spatial_posterior_score', 'save_pretrained', 'UntrainedOODHeadWarning', 'wrap']
