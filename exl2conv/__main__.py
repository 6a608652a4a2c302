from exl2conv.cli import entry

if __name__ == "__main__":
    entry()
