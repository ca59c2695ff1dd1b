"""ΔH and Fisher estimators (math only, no files): AdamW replay, entropy gradients and the
first order δH₁, their bootstrap statistics, per-sequence gradients and the Fisher kernel."""
