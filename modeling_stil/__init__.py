"""stil models: configs + PreTrainedModels, SSL methods and the Accelerate training loop.

Importing this package registers every model with the transformers Auto classes.
"""

from .auto import register_auto_classes

register_auto_classes()
