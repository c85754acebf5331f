`zwrm apps history` showed each version's image and replica count only, so a failed update
and its revert looked like the versions around them. A CHANGED column now says which spec
fields each version changed from the one before it (`health, update`), and `as version N`
when it is an earlier spec again (the revert of a failed update, a rollback).
