The web console's app cards have a Spec button: the app's spec as JSON to edit, with Plan (what a deploy would change) and Deploy, as `zwrm apps spec` and `zwrm deploy --file`.
