"""SLO-attainment benchmark on the cluster simulator (the paper's Fig. 9)."""
