"""What people read: value formatting, terminal tables, HTML, the model card, folder inspection."""
