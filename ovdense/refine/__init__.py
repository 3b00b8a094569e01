"""Post-processing of dense predictions: PAMR, CLIPtrase clustering."""
