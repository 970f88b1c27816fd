"""Search for a person: confidence of each score and the trusted search view of the query API."""
