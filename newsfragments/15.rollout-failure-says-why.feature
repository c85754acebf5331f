A rolling update whose new machine was not healthy in time said only the machine's state and
health ("state running, health starting"). It now also says how many times its restart policy
restarted it during the update and what its last failing check answered, e.g. `last check:
health failing: GET /nosuch on port 41061 answered 404`: a redeploy with a wrong health path
says so.
