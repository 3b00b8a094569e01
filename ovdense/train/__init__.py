"""Training pieces that are plain torch (losses, seeded sampling); the mmengine glue that uses
them lives in ``ovdense/mm/``. Inference never imports this package."""
