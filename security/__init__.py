"""Keys, encryption, policies, API keys and roles, quotas, audit log, upload safety."""
