"""The multi-VM lab's own helpers (Vagrantfile, provision/*.sh): the plan of machines and addresses, the
sealed hand-over of secrets between VMs, the controller's seeding and the people's scripted CLI use.

They run from the repository synced to /wicket inside each VM, with the venv `make setup` builds there.
"""
