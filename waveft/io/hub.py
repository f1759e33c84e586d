"""The upload of a finished run's adapter folder to the Hugging Face Hub (config `hub:`)."""
from waveft.errors import UserError


def push_adapter_folder(hub, folder: str, say=print) -> str:
    """Create `hub.repo_id` if needed (private when `hub.private`) and upload `folder` (the adapter, its model card,
    its samples and exports) in one commit with HfApi.upload_folder. Returns the commit's URL.

    A failure (offline, no token, no permission, a bad repo id) is one UserError that says how to upload later;
    nothing local is touched."""
    import httpx2  # huggingface_hub's HTTP client: its connection errors are not OSErrors
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
        commit = api.upload_folder(repo_id=hub.repo_id, folder_path=folder,
                                   commit_message="Upload the WaveFT SDXL DreamBooth adapter")
    # OSError: the Hub's HTTP errors, offline mode; httpx2.HTTPError: no connection; ValueError: a malformed repo id
    except (OSError, httpx2.HTTPError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"hub.push: uploading {folder} to {hub.repo_id} failed ({reason}); the run is saved; "
                        f"upload it later with: hf upload {hub.repo_id} {folder} .") from None
    say(f"adapter uploaded to https://huggingface.co/{hub.repo_id} ({commit.oid[:10]})")
    return commit.commit_url
