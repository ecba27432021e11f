"""Human spot-checks in Argilla: stratified samples out, annotations back, agreement with reward and CAR."""
