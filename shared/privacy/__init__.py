"""Privacy vocabulary shared by the merchant, the server and the auditors.

``events`` records what happened (the DP-SGD mechanism of each call); ``accounting`` turns
events into ε and plans noise for a budget (every accountant is called there and nowhere
else); ``budget`` is a merchant's persisted budget and spend history, which the merchant
enforces and an auditor re-reads.
"""
