"""`fedemb report`: tables and figures from run directories (fedemb.report.writer)."""
