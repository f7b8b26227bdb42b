"""What the data stage does to images for a method: the batched view recipe (``views``, with
``color``) and each pretext task's transform, one per module (their contract: ``pretext``)."""
