from recbole_perpeft.data.dataset import MultimodalSequentialDataset
from recbole_perpeft.data.modality_store import ItemModalityStore
from recbole_perpeft.data.utils import create_dataset, data_preparation

__all__ = ["MultimodalSequentialDataset", "ItemModalityStore", "create_dataset", "data_preparation"]
