"""PerPEFT for RecBole: personalised parameter-efficient fine-tuning of multimodal foundation models for
sequential recommendation. Importing the package does nothing else: the models, datasets and trainers live in
its modules (``recbole_perpeft.quick_start`` runs a model as the command line does)."""

__version__ = "0.1.0"
