"""Who is in which call: rooms and their participants."""
