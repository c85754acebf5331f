A redeploy may leave out `--image` (`zwrm deploy web --env A=1`): the current version's image
is kept, as every other field left out is. A deploy that gives nothing at all is a usage error,
and a first deploy without an image says that it needs one.
