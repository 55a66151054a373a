"""w/o MM (the paper's ablation): GlobalPEFT without the multimodal item side. The item vector is the
ID embedding alone; everything else is GlobalPEFT's (training loader, ``loss_type``, backbone, schedule,
evaluation), so the difference to GlobalPEFT is what the foundation model and its adapter add.

Nothing of the foundation model is built: no encoder is loaded, no token, image or feature cache is
read or written, and the item table is the embedding matrix."""

from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT


class WithoutMM(GlobalPEFT):
    has_item_tower = False

    def parameter_components(self) -> dict:
        return {"item_id_embedding": self.item_id_embedding, "backbone": self.backbone}

    def foundation_parameter_count(self) -> int:
        return 0
