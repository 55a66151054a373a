"""General (non-sequential) recommenders of ours: one model a file, class ``X`` in ``x.py`` (utils.py finds them).
They run on :class:`~recbole_perpeft.data.general_dataset.MultimodalGeneralDataset`: the users, items and split
of the sequential models, scored by RecBole's history-masked full-sort evaluation for general models."""
