"""Input pipeline: MDS contract, preparation, multi-crop augmentation, masking collate, resumable streaming."""
