"""h2po: seed-set-conditioned generative retrieval (MOST pretraining, H2PO fine-tuning). See README.md."""
